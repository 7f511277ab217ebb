"""`accelerate launch` recipes: imagenet.py, face_attributes.py, facenet.py (configs in configs/)."""
