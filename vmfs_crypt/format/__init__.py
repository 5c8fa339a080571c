"""The on-disk format (docs/FORMAT.md): key records, descriptors, folder key files, file kinds, the journal."""
