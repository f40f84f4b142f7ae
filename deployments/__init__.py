"""The Ray Serve graph: ingress -> preprocess -> vlm, with the rate limiter beside the ingress.

`app.build_app` is the config's `import_path`; `options` holds every deployment's defaults. Each
deployment is thin: it turns handles and settings into calls on `engine/` and `serve_app/`.
"""
