"""pacs-appliance: tiered storage and disaster recovery for picture archives."""

__version__ = "0.1.0"
