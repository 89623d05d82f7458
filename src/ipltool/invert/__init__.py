"""Photo -> aligned face -> W+ code -> stylized picture, pasted back into the photo."""
