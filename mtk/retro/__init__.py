"""RETRO's retrieval project: a chunk database, its embeddings and index, and every training
sample's neighbours, built by stages that record what they did in the project folder."""
