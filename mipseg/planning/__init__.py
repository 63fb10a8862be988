"""mipseg_plan: fingerprint, plans, splits, preprocessing and the MIPs the annotator draws on."""
