"""Routing analysis (OLMoE paper section 5): traces of a checkpoint's routing and the analyses over them."""
