"""Kernel interfaces: userfaultfd, pagemap and PAGEMAP_SCAN, dirty logs, feature probes."""
