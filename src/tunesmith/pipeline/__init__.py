"""One run, assembled and carried out: finetune(recipe), the loop's seams, provenance."""
