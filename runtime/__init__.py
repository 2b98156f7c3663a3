"""Programs that run on the deployed hosts (the chat server and what it uses), as ordinary modules."""
