"""Reports people read: evaluation metrics files and the plots that go with them."""
