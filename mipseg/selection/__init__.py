"""Choose the best trained model or ensemble and its postprocessing (mipseg_find_best_configuration)."""
