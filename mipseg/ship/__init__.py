"""Ship a trained model: one zip to export and install (mipseg_export_model, mipseg_install_model)."""
