-- wrk script: POST a JSON body read from a file, extra headers as "name: value" arguments,
-- and print the summary as one JSON line (latency in microseconds) for bench/run.py.
-- usage: wrk ... -s post.lua URL -- BODY_FILE ["name: value" ...]

function init(args)
   local f = assert(io.open(args[1], "rb"))
   wrk.body = f:read("*a")
   f:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   for i = 2, #args do
      local name, value = args[i]:match("^([^:]+):%s*(.*)$")
      if name then wrk.headers[name] = value end
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, ' ..
      '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
