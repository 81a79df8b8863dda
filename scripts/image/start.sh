#!/bin/sh
# Container entrypoint of the ExApp images: with HaRP (AppAPI sets HP_SHARED_KEY, HP_FRP_ADDRESS, HP_FRP_PORT) start
# the FRP client that tunnels HaRP's port to the app's unix socket, then run the app (the arguments).
set -e
if [ -n "$HP_SHARED_KEY" ]; then
    sock="${HP_EXAPP_SOCK:-/tmp/exapp.sock}"
    {
        echo "serverAddr = \"$HP_FRP_ADDRESS\""
        echo "serverPort = $HP_FRP_PORT"
        echo "loginFailExit = false"
        if [ -d /certs/frp ]; then
            echo "transport.tls.enable = true"
            echo "transport.tls.certFile = \"/certs/frp/client.crt\""
            echo "transport.tls.keyFile = \"/certs/frp/client.key\""
            echo "transport.tls.trustedCaFile = \"/certs/frp/ca.crt\""
            echo "transport.tls.serverName = \"harp.nc\""
        else
            echo "transport.tls.enable = false"
        fi
        echo "metadatas.token = \"$HP_SHARED_KEY\""
        echo ""
        echo "[[proxies]]"
        echo "remotePort = $APP_PORT"
        echo "type = \"tcp\""
        echo "name = \"$APP_ID\""
        echo "[proxies.plugin]"
        echo "type = \"unix_domain_socket\""
        echo "unixPath = \"$sock\""
    } > /frpc.toml
    frpc -c /frpc.toml &
fi
exec "$@"
