"""The JSON API (``openacct api serve``) and the web portal: a front end like the CLI, for users,
PIs and the managers they name, who have no database credentials. ``app.create_app`` builds it;
``auth`` says who a request comes from, ``access`` what they may see and do."""
