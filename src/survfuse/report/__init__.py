"""Report tables, figures and the HTML page (sits on top of the library)."""
