"""totalseg_fast: a drop-in for ``TotalSegmentator --fast`` on CPU (the study's winning pipeline as a tool).

cli: the command; inputs: NIfTI (and DICOM) in; engines: local (this process) and Ray (cohorts)."""
