"""Every method module is imported here so that it registers itself."""

from semiseg.methods import supervised  # noqa: F401
