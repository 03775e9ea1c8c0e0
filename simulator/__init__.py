"""The synthetic scanner: phantoms of head and chest, scanner conditions, whole DICOM studies."""
