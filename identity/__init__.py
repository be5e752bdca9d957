"""Identity: identifier types, normalisation and hashing, the guarded identity graph
(merge, refuse, split, erase, explain) and its stored evidence. Knows nothing of
audiences or HTTP."""
