"""The package version (one place; mm.__version__ and exported manifests read it)."""
__version__ = "0.1.0"
