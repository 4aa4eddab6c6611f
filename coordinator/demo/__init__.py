"""`ember demo`: a whole federation on one machine, from nothing to a trained model."""
