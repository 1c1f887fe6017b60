"""The trainer: Config -> build data, method, optimizer -> one loop for every method."""
