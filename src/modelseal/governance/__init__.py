"""Layer 5 (below the recipes): who may do what. Cedar authorization, roles and bindings,
separation of duties, encryption standards and their exceptions, step-up MFA, two-person
approval, grants and access reviews (docs/governance.md). Pure decisions with their state
in one SQL store; the server (``server.authz``) is the only place requests are decided.
"""
