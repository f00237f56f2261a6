"""Nipype workflows: they only wire the interfaces of cmb_workflow.interfaces."""
