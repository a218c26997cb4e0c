"""The bank store: products, their bank versions and the backbone they share, in the BentoML
model store.

- `location`: which folder the model store is (one answer for BentoML and this code);
- `products`: product names, the live version, the per-product lock, retention;
- `versions`: making a version, history, rollback, loading a version's bank checked;
- `changes`: the changes an operator makes (images added, operating point moved);
- `models`: saving a fit and its backbone, and loading a product's detector.

A library layer: the commands, the batch job, the records and the service import it; it
imports none of them (tests/test_layout.py holds it to that).
"""
