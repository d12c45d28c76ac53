from gems.version import __version__
