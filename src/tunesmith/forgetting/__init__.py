"""Against catastrophic forgetting: EWC, L2-SP, NEFTune, dropout, data mixing, and forgetting measured."""
