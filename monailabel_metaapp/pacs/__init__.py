"""A PACS for the app: DICOM conversion, a local Orthanc, and the DICOMweb datastore glue."""
