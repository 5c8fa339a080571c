"""Operations on a datastore: offline disk operations (create, encrypt, decrypt, rekey, cat, info) and mounting."""
