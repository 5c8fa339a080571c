"""The filesystem core, free of FUSE: namespace rules, open files, the encrypted data path; testable without a mount."""
