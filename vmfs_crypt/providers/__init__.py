"""Key providers: where KEKs come from (the embedded native provider, a KMIP cluster)."""
