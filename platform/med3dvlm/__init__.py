"""med3dvlm: the library (models, data, training loops, metrics). Never starts Ray on import."""
