"""metsflow: cohort-scale brain-metastasis segmentation in longitudinal MRI."""

__version__ = "0.1.0"
