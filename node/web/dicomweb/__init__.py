"""DICOMweb on the node's HTTP server: QIDO-RS, WADO-RS and STOW-RS at ``/dicom-web`` (PS3.18)."""

from node.web.dicomweb.routes import PREFIX, DicomWebServices, dicomweb_mount, node_dicomweb

__all__ = ["PREFIX", "DicomWebServices", "dicomweb_mount", "node_dicomweb"]
