"""Everything PACS: the datastore over DICOMweb (`datastore`), building it from MONAI Label's settings
(`connect`), DICOM conversion of volumes and labels (`dicom_io`), and a local Orthanc (`orthanc`)."""
