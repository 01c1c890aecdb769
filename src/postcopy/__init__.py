"""postcopy: live migration of a running guest process between Linux hosts."""

__version__ = "0.1.0"
