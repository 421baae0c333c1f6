"""The minimal trainer: model zoo and a training loop that saves every epoch."""
