"""Files: reading images, artifact folders, pictures, and the one atomic writer they all use."""
