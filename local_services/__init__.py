"""A local Kafka-protocol broker (tansu) and Redis for development, the demo and the tests: started, probed and stopped by pid file. Not on the product's runtime path."""
