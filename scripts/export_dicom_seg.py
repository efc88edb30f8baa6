"""Snakemake entry point: a DICOM SEG per final label of the studies imported from DICOM."""

from metsflow.core.layout import Layout
from metsflow.jobs.export import FinalExport, run_export_dicom_seg
from metsflow.jobs.logs import job_logging

with job_logging(snakemake.log[0]):
    run_export_dicom_seg(
        Layout.from_config(snakemake.config), FinalExport.from_snakemake(snakemake)
    )
