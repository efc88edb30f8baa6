"""Snakemake entry point: a DICOM SEG per final label of the studies imported from DICOM."""

from metsflow.jobs.export import FinalExport, run_export_dicom_seg
from metsflow.jobs.logs import job_logging
from metsflow.layout import Layout

with job_logging(snakemake.log[0]):
    run_export_dicom_seg(
        Layout.from_config(snakemake.config), FinalExport.from_snakemake(snakemake)
    )
