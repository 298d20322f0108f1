"""The traffic simulator: replays MELD / EmoryNLP dialogues or synthetic conversations onto the input topic as live
chats. Imports the model store (its data loaders) and the foundation."""
