"""The attention core: the Controller, the patch API, layers, the schedule, context patches, word lookup."""
