"""One module per Ray Serve deployment of the graph: ingress -> preprocess -> vlm."""
