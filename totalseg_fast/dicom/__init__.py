"""DICOM in (a series folder or zip, converted as TotalSegmentator does) and out (DICOM-SEG, RT-STRUCT)."""
