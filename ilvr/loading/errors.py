"""The one error model loading raises, with a message meant for the user."""


class ModelLoadError(RuntimeError):
    """A model that could not be loaded, with a message meant for the user."""
