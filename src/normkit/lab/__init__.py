"""``normkit lab``: the article's claims about normalization re-measured on seeded training runs, with a report."""
