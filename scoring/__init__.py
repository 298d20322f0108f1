"""The scoring path shared by serving and training: the prompt builder, the labeler, tenant routes, backends, the label-prior correction."""
