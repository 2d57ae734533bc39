// Records the request Istio's istio-cni plugin sends to its agent's log.sock, for meshcni's interop test
// (node-agent/tests/data/istio-plugin-log-request.http). It logs with zap configured as Istio's pkg/log does
// (JSON encoder; keys time, level, scope, msg; lowercase levels; UTC time with microseconds), keeps the encoded
// entries as Istio's UDS core does, and posts them the way Istio's Sync does: one POST of a JSON array of the
// encoded lines, with Go's http client dialing the unix socket. Run: ./record.sh (needs golang-go.uber-zap-dev).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"go.uber.org/zap/zapcore"
)

func istioTime(t time.Time, enc zapcore.PrimitiveArrayEncoder) {
	enc.AppendString(t.UTC().Format("2006-01-02T15:04:05.000000Z07:00"))
}

func main() {
	sock := os.Args[1]
	enc := zapcore.NewJSONEncoder(zapcore.EncoderConfig{
		TimeKey: "time", LevelKey: "level", NameKey: "scope", CallerKey: "caller", MessageKey: "msg",
		StacktraceKey: "stack", LineEnding: zapcore.DefaultLineEnding, EncodeLevel: zapcore.LowercaseLevelEncoder,
		EncodeCaller: zapcore.ShortCallerEncoder, EncodeDuration: zapcore.StringDurationEncoder, EncodeTime: istioTime,
	})
	at := time.Date(2026, 3, 1, 12, 0, 0, 123456000, time.UTC)
	entries := []struct {
		level  zapcore.Level
		msg    string
		fields []zapcore.Field
	}{
		// What Istio's CmdAdd logs for a pod without the injector's annotation, and for its own agent pod.
		{zapcore.DebugLevel, "istio-cni CmdAdd config: {Kubernetes:<nil> PluginLogLevel:debug}", []zapcore.Field{{Key: "if", Type: zapcore.StringType, String: "eth0"}}},
		{zapcore.InfoLevel, "excluded due to not containing sidecar annotation", []zapcore.Field{{Key: "pod", Type: zapcore.StringType, String: "default/plain-0"}}},
		{zapcore.WarnLevel, "in a degraded state and istio-cni-node-x is not a CNI pod", []zapcore.Field{{Key: "pod", Type: zapcore.StringType, String: "istio-system/istio-cni-node-x"}}},
		{zapcore.ErrorLevel, "Failed to get pod info: pods \"ghost\" not found", []zapcore.Field{{Key: "pod", Type: zapcore.StringType, String: "default/ghost"}, {Key: "retries", Type: zapcore.Int64Type, Integer: 3}}},
	}
	lines := []string{}
	for i, e := range entries {
		buf, err := enc.EncodeEntry(zapcore.Entry{Level: e.level, Time: at.Add(time.Duration(i) * time.Millisecond), Message: e.msg}, e.fields)
		if err != nil {
			panic(err)
		}
		lines = append(lines, buf.String())
	}
	body, err := json.Marshal(lines)
	if err != nil {
		panic(err)
	}
	c := http.Client{
		Transport: &http.Transport{DialContext: func(_ context.Context, _, _ string) (net.Conn, error) {
			return net.Dial("unix", sock)
		}},
		Timeout: time.Second,
	}
	resp, err := c.Post("http://unix/log", "application/json", bytes.NewReader(body))
	if err != nil {
		panic(err)
	}
	fmt.Println(resp.Status)
}
