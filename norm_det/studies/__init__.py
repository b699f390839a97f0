"""The papers' effects measured on data made in code (docs/czm.md, docs/studies.md)."""
