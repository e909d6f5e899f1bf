"""The execution-statistics page: how long each chapter took to build, and which cards made the data."""
