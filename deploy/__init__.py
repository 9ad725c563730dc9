"""The deploy: puts the Space (the package space/ and the base common/ beside it) on a Hugging Face Space, follows its
build and chats once with every model (scripts/deploy_space.py, its entry point; the logic in deploy/cli.py).

It runs here and is never uploaded: space/ imports nothing of it, and it imports space/ (the catalog of servers, the
report's check) and common/ (the Hub helpers)."""
