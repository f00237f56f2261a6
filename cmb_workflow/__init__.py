"""cmb-workflow: cerebral microbleed detection on SWI / T2*-GRE MRI with SHIVA-CMB models."""

__version__ = "0.1.0"
